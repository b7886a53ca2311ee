"""autospa.io"""
