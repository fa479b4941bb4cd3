"""Helpers shared by the operator tests (schema checks, the kmock operator harness)."""
