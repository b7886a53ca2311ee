"""autospa.scheme"""
