"""What a forward pass is made of: ops, passes that step many requests' rows through a model
one op at a time, and the KV cache those passes fill."""
