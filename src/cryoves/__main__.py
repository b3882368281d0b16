from cryoves.cli import run

run()
