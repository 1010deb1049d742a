"""Helpers the tests share (fakes and builders, no tests here)."""
