from mlxdist.cli import main

main()
