"""The HTTP publish API: validate, stamp id and time, publish, 202 once Pub/Sub has it."""
