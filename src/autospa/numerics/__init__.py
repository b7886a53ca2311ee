"""autospa.numerics"""
