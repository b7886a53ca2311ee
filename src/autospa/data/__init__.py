"""autospa.data"""
