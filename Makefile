# Thin wrappers: every target goes through scripts/run.sh, the one setup path.
.PHONY: setup repro test lab bench
setup:
	bash scripts/run.sh setup
repro:
	bash scripts/run.sh repro
test:
	bash scripts/run.sh test
lab:
	bash scripts/run.sh lab
bench:
	bash scripts/run.sh bench
