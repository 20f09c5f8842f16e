from sparsebert.cli import main

main()
