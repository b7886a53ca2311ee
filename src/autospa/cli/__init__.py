"""autospa.cli"""
