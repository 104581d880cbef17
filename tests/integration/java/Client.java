// Classroom-style demo client: retries its connect every 100 ms until the server is up.
// Usage: java Client HOST PORT
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.net.Socket;

public class Client {
    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        Socket socket = null;
        while (socket == null) {
            try {
                socket = new Socket(host, port);
            } catch (IOException e) {
                Thread.sleep(100);
            }
        }
        try (Socket s = socket) {
            DataOutputStream out = new DataOutputStream(s.getOutputStream());
            DataInputStream in = new DataInputStream(s.getInputStream());
            out.writeInt(123);
            out.writeDouble(1234567890.1234567890);
            out.write("hola".getBytes());
            out.flush();
            byte[] reply = new byte[4];
            in.readFully(reply);
            System.out.println(new String(reply));
            out.writeDouble(1.1);
            out.writeDouble(1.2);
            out.writeDouble(1.3);
            out.writeDouble(1.4);
            out.writeDouble(1.5);
            out.flush();
        }
    }
}
