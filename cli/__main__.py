from dynamics.cli.main import main

main()
