"""autospa.preprocess"""
