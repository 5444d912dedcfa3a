// Command kstatus prints the kstatus verdict (sigs.k8s.io/cli-utils/pkg/kstatus/status),
// the library Flux uses for health, for each object read on stdin.
//
// Input: a JSON list of objects, or JSON objects one after another (one per line, or
// pretty-printed over several lines).
// Output: one JSON line per object: {"name": ..., "status": ..., "message": ...}, where
// status is Current, InProgress, Failed, Terminating or Unknown.
// Used by tests/chart/test_kstatus.py; built by hack/build-tools.sh (target kstatus).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

// objects decodes with apimachinery's JSON, which keeps whole numbers int64 as the API
// machinery expects (encoding/json would give float64 and fail metadata.generation).
func objects(in []byte) ([]map[string]interface{}, error) {
	trimmed := bytes.TrimSpace(in)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var list []map[string]interface{}
		if err := utiljson.Unmarshal(trimmed, &list); err != nil {
			return nil, fmt.Errorf("reading a JSON list: %w", err)
		}
		return list, nil
	}
	// One object after another: one per line, or pretty-printed over many lines.
	var out []map[string]interface{}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	for n := 1; ; n++ {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			return out, nil
		} else if err != nil {
			return nil, fmt.Errorf("object %d: %w", n, err)
		}
		var obj map[string]interface{}
		if err := utiljson.Unmarshal(raw, &obj); err != nil {
			return nil, fmt.Errorf("object %d: %w", n, err)
		}
		out = append(out, obj)
	}
}

func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
	objs, err := objects(in)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	for _, obj := range objs {
		u := &unstructured.Unstructured{Object: obj}
		res, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s: %v\n", u.GetName(), err)
			os.Exit(1)
		}
		if err := enc.Encode(verdict{Name: u.GetName(), Status: res.Status.String(), Message: res.Message}); err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", err)
			os.Exit(1)
		}
	}
}
