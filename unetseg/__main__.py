from unetseg.cli import main

main()
