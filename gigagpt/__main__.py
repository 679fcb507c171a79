from gigagpt.cli import main

main()
