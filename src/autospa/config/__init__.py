"""autospa.config"""
