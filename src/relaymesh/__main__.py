from relaymesh.cli import main

main()
