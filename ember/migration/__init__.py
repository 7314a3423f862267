"""ember.migration"""
