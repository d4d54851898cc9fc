.PHONY: demo test bench

demo:
	scripts/setup.sh
	.venv/bin/ferry demo

test:
	scripts/test.sh

bench:
	scripts/setup.sh --test
	for b in bench/*.py; do .venv/bin/python $$b; done
