from gigagpt.commands import main

main()
