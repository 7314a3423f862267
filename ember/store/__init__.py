"""ember.store"""
