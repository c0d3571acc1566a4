// The stand-in for the seed README's VideoEncoder: a real encoder, gzip (its level from
// the first argument), that emits 'progress' (a fraction) as its input passes through,
// measured against the size of the stream piped into it.

var zlib = require('zlib')

module.exports = function VideoEncoder (args) {
	var encoder = zlib.createGzip({ level: Number(args[0]) || 6 })
	var total = null
	var done = 0
	encoder.on('pipe', function (source) { total = source.size })
	var write = encoder.write
	encoder.write = function (chunk) {
		done += chunk.length
		if (total) encoder.emit('progress', Math.min(done / total, 1))
		return write.apply(encoder, arguments)
	}
	return encoder
}
