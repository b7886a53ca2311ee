"""autospa.distributed"""
