# Shortcuts for developers; the README's commands are the scripts themselves.
.PHONY: setup test unit demo bench lint
setup:
	./scripts/setup-host
test:
	./scripts/test
unit:
	./scripts/setup-host --no-guest && .venv/bin/python -m pytest -q -m "not libvirt and not guest and not compat" tests/unit
demo:
	./scripts/demo
lint:
	.venv/bin/python -m mypy vmbk
