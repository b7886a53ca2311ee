"""autospa.ranker"""
