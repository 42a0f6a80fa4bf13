from featurepipe.cli import main

main()
