from moe_cli.cli.app import main

main()
