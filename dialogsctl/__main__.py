from dialogsctl.cli import main

main()
