.PHONY: setup demo test bench

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/ferry demo

test:
	scripts/test.sh

bench: setup
	for b in bench/*.py; do .venv/bin/python $$b; done
