"""autospa.jobs"""
