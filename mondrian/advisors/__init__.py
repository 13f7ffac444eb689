"""Advisor contracts shipped with mondrian, one YAML file each."""
