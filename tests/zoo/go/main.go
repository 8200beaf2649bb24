// Go net/http echo. A JSON body is decoded with encoding/json into a struct, as Go services
// do: keys match struct fields case-insensitively, the last one wins, and the Content-Type is
// not checked. Otherwise r.FormValue (form body before query, first value).
package main

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
)

type Refund struct {
	Amount  any    `json:"amount"`
	Charge  any    `json:"charge"`
	Method  any    `json:"method"`
	Account any    `json:"account"`
}

func main() {
	var headers []string
	_ = json.Unmarshal([]byte(os.Args[2]), &headers)
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fields := map[string]any{}
		ct := r.Header.Get("Content-Type")
		if strings.HasPrefix(ct, "application/x-www-form-urlencoded") || r.ContentLength == 0 {
			_ = r.ParseForm()
			for k := range r.Form {
				fields[k] = r.FormValue(k)
			}
		} else {
			var v Refund
			if err := json.NewDecoder(r.Body).Decode(&v); err == nil {
				for k, x := range map[string]any{"amount": v.Amount, "charge": v.Charge, "method": v.Method, "account": v.Account} {
					if x != nil {
						fields[k] = x
					}
				}
			}
			for k, vs := range r.URL.Query() {
				if _, ok := fields[k]; !ok && len(vs) > 0 {
					fields[k] = vs[0]
				}
			}
		}
		hs := map[string]string{}
		for _, h := range headers {
			if v := r.Header.Get(h); v != "" {
				hs[h] = v
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"stack": "go", "method": r.Method, "path": r.URL.Path, "fields": fields, "headers": hs})
	})
	_ = http.ListenAndServe("127.0.0.1:"+os.Args[1], nil)
}
