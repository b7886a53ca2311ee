"""autospa.simulate"""
