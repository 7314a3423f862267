"""ember.api"""
