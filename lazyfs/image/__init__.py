"""Whole images: conversion of an OCI image to lazyfs layers, and what `lazyfs inspect` shows."""
