"""ember.controller"""
