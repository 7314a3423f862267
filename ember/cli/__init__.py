"""ember.cli"""
