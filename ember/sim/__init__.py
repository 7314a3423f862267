"""ember.sim"""
