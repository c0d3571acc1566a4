from wsq.cli import main

main()
