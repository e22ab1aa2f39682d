"""Tests of detbalance.losses."""
