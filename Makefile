# dino_tracker_ros: one-command environment, tests and demo. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV ?= $(ROOT)/.venv
# every recipe line that needs the project's environment starts with this
ENV := cd "$(ROOT)" && source "$(ROOT)/env.sh" &&

PYTEST_ARGS ?=
DEMO_ARGS ?=
CLIP ?=
ARGS ?=
export TORCH_SPEC VENV

.PHONY: help setup test demo nodes lint docs bench clean distclean

help:
	@echo "make setup   create/update .venv and colcon-build both packages (TORCH_SPEC=skip keeps your torch)"
	@echo "make test    the whole test suite (PYTEST_ARGS='-k name -x' passes pytest options)"
	@echo "make demo    the demo on the embedded default clip (CLIP=path: your own video; DEMO_ARGS=...)"
	@echo "make nodes   recorder, trainer and tracker in one process, namespace /dino_tracker"
	@echo "             (ARGS='--ros-args -p clip_dir:=/some/dir' passes ROS arguments)"
	@echo "make lint    ruff over all Python"
	@echo "make docs    regenerate docs/configuration.md from the configuration schema"
	@echo "make bench   accuracy and speed benchmarks (BENCH_ARGS=--quick for a short run)"
	@echo "make clean   remove build/, install/, log/ (distclean: also .venv/)"

setup:
	@bash "$(ROOT)/tools/setup.sh"

test: setup
	@$(ENV) python -m pytest "$(ROOT)/dino_tracker_ros/test" $(PYTEST_ARGS)

demo: setup
	@$(ENV) python -m dino_tracker_ros.demo $(if $(CLIP),--clip "$(CLIP)") $(DEMO_ARGS)

# ARGS may start with its own --ros-args; we are inside a --ros-args section already.
nodes: setup
	@$(ENV) set -- $(ARGS) && { [ "$${1:-}" != --ros-args ] || shift; } && \
	exec python -m dino_tracker_ros.ros.composed --ros-args -r __ns:=/dino_tracker \
		--params-file "$(ROOT)/dino_tracker_ros/config/dino_tracker.yaml" "$$@"

lint: | $(VENV)/bin/ruff
	@cd "$(ROOT)" && "$(VENV)/bin/ruff" check .

$(VENV)/bin/ruff:
	@bash "$(ROOT)/tools/setup.sh"

docs: setup
	@$(ENV) python tools/gen_config_doc.py

BENCH_ARGS ?=
bench: setup
	@$(ENV) python bench/accuracy.py $(BENCH_ARGS) && python bench/speed.py $(BENCH_ARGS) \
		&& python bench/ros_service.py $(BENCH_ARGS) \
		&& python bench/live.py $(BENCH_ARGS) && python bench/paper.py $(BENCH_ARGS)

clean:
	rm -rf "$(ROOT)/build" "$(ROOT)/install" "$(ROOT)/log"

distclean: clean
	rm -rf "$(VENV)"
