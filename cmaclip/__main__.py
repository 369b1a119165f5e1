from cmaclip.cli import main

main()
