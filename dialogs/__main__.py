from dialogs.cli import main

main()
