from dalle2_cli.cli import main

main()
