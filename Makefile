# One front door: `make run` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench lint migrate clean translations vendor

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the app on the embedded default (+ sandbox portal without B24 credentials)
	$(BIN)/python -m sandbox.devrun

test: $(STAMP)  ## the whole suite: on both cores (pytest-xdist), then the latency-bound tests alone
	$(BIN)/python -m pytest -n 4 -m "not serial" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m serial $(PYTEST_ARGS)

bench: $(STAMP)  ## benchmarks (not tests): print tables, write bench/out/
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench

lint: $(STAMP)  ## ruff over the code, tests and benchmarks; mypy over what the app runs
	$(BIN)/ruff check app workers placements sandbox tests bench
	$(BIN)/mypy app workers placements

translations: $(STAMP)  ## re-extract every string, merge it into each language's catalogue, compile
	$(BIN)/pybabel extract -F babel.cfg -k lazy_gettext -k _l --sort-output --no-location \
		--no-wrap --project b24relay -o app/translations/messages.pot .
	$(BIN)/pybabel update -i app/translations/messages.pot -d app/translations \
		--no-fuzzy-matching --no-wrap --ignore-obsolete
	$(BIN)/pybabel compile -d app/translations

# The charts' library, from the npm registry at the version package-lock.json pins (with its
# integrity hash). The copies in static/vendor/ are committed: `make run` needs only Python.
VENDOR := static/vendor
vendor:  ## npm ci, then copy the built front-end libraries into static/vendor/
	npm ci --no-audit --no-fund
	mkdir -p $(VENDOR)
	cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css \
		node_modules/uplot/LICENSE $(VENDOR)/
	mv $(VENDOR)/LICENSE $(VENDOR)/uPlot.LICENSE
	@echo "vendored uPlot $$(node -p "require('./node_modules/uplot/package.json').version")"

migrate: $(STAMP)
	$(BIN)/flask --app wsgi db upgrade

clean:
	rm -rf $(VENV) instance *.egg-info
