# The two set-up commands of the README. Both work on a fresh machine (they install what they need).
.PHONY: serve test lint proto

serve:
	bash scripts/install.sh
	.venv/bin/kdn serve

test:
	bash scripts/install.sh --test
	bash scripts/install_engines.sh
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	KDN_STRICT_SKIPS=1 .venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/lint-imports

proto:
	scripts/gen_proto.sh
