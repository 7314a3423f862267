"""ember.policy"""
