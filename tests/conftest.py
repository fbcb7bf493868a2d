"""Shared fixtures: the tiny contract-conforming model and the DX encodings."""

pytest_plugins = ["tests.support.fixtures"]
