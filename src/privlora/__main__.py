from privlora.cli import main

main()
