"""What each exported graph computes (`graphs.stack`) and the one I/O name table (`graphs.io`).

One graph per stack serves both prefill (seq > 1) and decode (seq = 1):

    stack k graph:  input_ids [batch, seq] int64, pos [batch] int64
                    self.{k,v}.{l}      [batch, Hkv, C_self, D]   ring of this stack's layer l
                    cross.{k,v}.{l}     [batch, Hkv, C_cross, D]  (k > 1) ring of memory entries < pos
                    cross_in.{k,v}.{l}  [batch, Hkv, seq, D]      (k > 1) memory entries pos..pos+seq-1
              ->    new_self.{k,v}.{l}  [batch, Hkv, seq, D]      entries to commit to self ring
                    cross_out.{k,v}.{l} [batch, Hkv, seq, D]      (k < P) next stack's entries pos+1..pos+seq
                    cross_null.{k,v}.{l}[batch, Hkv, 1, D]        (k < P) next stack's null entry M[0]
                    logits              [batch, seq, vocab] fp32  (k = P)

The export writes the table into manifest.json; the runtime binds buffers by these names and
never hard-codes one.
"""
