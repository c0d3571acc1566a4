from wsq.cli import main

main(prog_name="wsq")
