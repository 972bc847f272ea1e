"""Switchable USB hubs: power ports on and off and find each port's serial device."""
